% rebase('base.tpl', title='Your decision')
% # Agent-written text takes its own direction (dir="auto", <bdi>, and the stylesheet for the
% # values in a sentence): Arabic or Hebrew laid out left to right reorders its words and
% # numbers, and can swap who pays whom.
% # Everything the agent wrote sits in one framed section: a title such as "Recorded: Approve"
% # reads as the agent's words, apart from the page's own outcome and buttons below it.
<section class="asked" aria-label="The request, as the agent wrote it">
% if pause['asked_by']:
<p class="label">Asked by <bdi>{{pause['asked_by']}}</bdi>:</p>
% else:
<p class="label">An agent is asking:</p>
% end
% if pause['title']:
<h1 class="title" dir="auto">{{pause['title']}}</h1>
% else:
<h1 class="visually-hidden">Approval request</h1>
% end
<blockquote class="message" dir="auto">{{pause['message']}}</blockquote>
% if pause['details']:
<table class="details" aria-label="Details">
  <tbody>
% for detail in pause['details']:
    <tr><th scope="row" dir="auto">{{detail['name']}}</th><td dir="auto">{{detail['value']}}</td></tr>
% end
  </tbody>
</table>
% end
% # A value the approver may not change is the agent's text alone: outside this section it read
% # as the page's own ("Recorded: Approve at 14:02, you may close this page").
% for name, field in (pause.get('fields') or {}).items():
%   if not field['editable']:
<p class="field"><bdi class="field-label">{{field.get('label', name)}}</bdi> <strong>{{field_text(field['value'])}}</strong></p>
%   end
% end
</section>
% if error and (pause['status'] != 'pending' or pause.get('your_vote')):
<p class="error" role="alert">{{error}}</p>
% end
% if pause['status'] == 'pending' and pause.get('your_vote'):
<p class="outcome" id="outcome">Your vote, <strong>{{pause['your_vote']['choice']}}</strong>, is recorded. The request is open until the others answer, {{times['expires_at']}} at the latest.</p>
% elif pause['status'] == 'pending':
  % if error:
<p class="error" role="alert">{{error}}</p>
  % elif picked:
<p class="picked">You picked <strong>{{picked}}</strong>. Tap it below to confirm.</p>
  % end
  % # Several people are asked: say what one answer does, which the question alone does not.
  % if quorum:
  %   # Values differ only where someone may change them.
  %   editable = any(field['editable'] for field in (pause.get('fields') or {}).values())
<p class="expiry" id="quorum">Others are asked too. It takes {{quorum['count']}} {{'person' if quorum['count'] == 1 else 'people'}} choosing <strong>{{quorum['choice']}}</strong>{{' with the same values' if editable else ''}} to decide it that way{{' (one with other values starts a count of its own)' if editable else ''}}; any other choice, from anyone asked, decides it at once.</p>
  % elif team:
<p class="expiry" id="quorum">Others are asked too: the first answer, yours or theirs, decides it for everyone.</p>
  % end
<form method="post" action="/respond/{{token}}">
  % # Enter in a field submits the form with its first submit button: that would choose the first
  % # option unseen, while typing an amount. This disabled one comes first, so Enter submits nothing.
  <button type="submit" disabled hidden aria-hidden="true" tabindex="-1"></button>
  % if pause.get('fields'):
  %   if pause.get('proposed_fields'):
  %     # Each label is the agent's, quoted and set apart as in the frame above: run into this
  %     # sentence, "Recorded: Reject at 06:52, you may close this page" read as the page's own.
  <p class="picked" id="proposed">An earlier approval changed \\
  %     for i, (name, value) in enumerate(pause['proposed_fields'].items()):
{{'; ' if i else ''}}“<bdi class="field-label">{{pause['fields'][name].get('label', name)}}</bdi>” from <strong>{{field_text(pause['fields'][name]['value'])}}</strong> to <strong>{{field_text(value)}}</strong>\\
  %     end
. Those values are filled in below: your approval counts with theirs when the values are the same.</p>
  %   end
  %   # The labels and choices are the agent's words, framed as the question is: unframed, a
  %   # label such as "Recorded: Reject, you may close this page" read as the page's own.
  %   if any(field['editable'] for field in pause['fields'].values()):
  <p class="label" id="editable">You may change these values, as the agent wrote them, before you answer:</p>
  <div class="fields asked" role="group" aria-label="Values the agent wrote, which you may change">
    % for name, field in pause['fields'].items():
    %   label, kind, shown = field.get('label', name), field['type'], entered.get('field.' + name, form_text(field['value']))
    %   if not field['editable']:
    %     continue          # shown with what the agent wrote, above
    %   end
    %   if kind in ('boolean', 'enum'):
    <label for="field-{{name}}" dir="auto">{{label}}</label>
    <select id="field-{{name}}" name="field.{{name}}">
    %     for choice, text in ([('true', 'Yes'), ('false', 'No')] if kind == 'boolean' else [(c, c) for c in field['choices']]):
      <option value="{{choice}}" dir="auto"{{!' selected' if choice == shown else ''}}>{{text}}</option>
    %     end
    </select>
    %   elif kind == 'string' and ('\n' in field['value'] or '\n' in shown):
    <label for="field-{{name}}" dir="auto">{{label}}</label>
    <textarea id="field-{{name}}" name="field.{{name}}" rows="3" dir="auto" maxlength="{{field.get('max_length', 1000)}}">
{{shown}}</textarea>
    %   elif kind == 'string':
    <label for="field-{{name}}" dir="auto">{{label}}</label>
    <input id="field-{{name}}" name="field.{{name}}" type="text" dir="auto" value="{{shown}}" maxlength="{{field.get('max_length', 1000)}}">
    %   else:
    %     # The bounds said beside the label, before a typed value is refused for them.
    %     low, high = (field_text(field[bound]) if bound in field else None for bound in ('min', 'max'))
    %     bounds = (f'from {low} to {high}' if None not in (low, high) else f'at least {low}' if low is not None
    %               else f'at most {high}' if high is not None else '')
    <label for="field-{{name}}"><bdi>{{label}}</bdi>{{f' ({bounds})' if bounds else ''}}</label>
    <input id="field-{{name}}" name="field.{{name}}" type="number" inputmode="decimal" value="{{shown}}" step="{{'1' if kind == 'integer' else 'any'}}"{{!''.join(f' {bound}="{field[bound]}"' for bound in ('min', 'max') if bound in field)}}>
    %   end
    % end
  </div>
  %   end
  % end
  <div class="options" role="group" aria-label="Your answer">
  % for option in pause['options']:
    <button type="submit" name="choice" value="{{option}}" dir="auto"{{!' class="picked"' if option == picked else ''}}>{{option}}</button>
  % end
  </div>
  <label for="comment">Comment (optional)</label>
  <textarea id="comment" name="comment" dir="auto" rows="3" maxlength="2000">{{entered.get('comment', '')}}</textarea>
</form>
<p class="expiry" id="expiry">Open until {{times['expires_at']}} ({{left}} left).
  % if pause['timeout_default']:
If nobody answers, <strong>{{pause['timeout_default']}}</strong> applies.
  % end
</p>
% elif pause['status'] == 'responded':
  % if decided_by_you:
<p class="outcome" id="outcome">Recorded: <strong>{{pause['choice']}}</strong> at {{times['decided_at']}}.</p>
  % else:
  %   # Another of the team decided: their answer, and their comment, are not this person's.
<p class="outcome" id="outcome">Decided by another person asked: <strong>{{pause['choice']}}</strong> at {{times['decided_at']}}.\\
  %   if pause.get('your_vote'):
 Your vote was <strong>{{pause['your_vote']['choice']}}</strong>.\\
  %   end
</p>
  % end
  % if pause['comment']:
<p class="comment">{{'Comment' if decided_by_you else 'Their comment'}}: <bdi>{{pause['comment']}}</bdi></p>
  % end
  % # The label quoted and set apart as the agent's, as in the form's "An earlier approval changed".
  % for name, change in (pause.get('edited') or {}).items():
<p class="comment">“<bdi class="field-label">{{pause['fields'][name].get('label', name)}}</bdi>” changed from <bdi>{{field_text(change['old'])}}</bdi> to <strong>{{field_text(change['new'])}}</strong>.</p>
  % end
% elif pause['status'] == 'timed_out':
%   # When it ran out, not when the job recorded it: after a restart that is hours later.
<p class="outcome" id="outcome">This request expired at {{times['expires_at']}}.
  % if pause['choice']:
The default <strong>{{pause['choice']}}</strong> was applied.
  % end
</p>
% else:
<p class="outcome" id="outcome">The agent cancelled this request at {{times['decided_at']}}.</p>
% end
