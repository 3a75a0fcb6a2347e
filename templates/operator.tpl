% rebase('dashboard.tpl', title='Operator', here='operator')
<h1>Operator</h1>
<h2>Registration</h2>
<p id="registration">Registration is <strong>{{'open' if registration else 'closed'}}</strong>,
{{'as set here on the dashboard (it overrides registration.open in the config)' if registration_source == 'dashboard' else 'as registration.open in the config says'}}.
% if not registration:
Add developers with <code>python pausepoint.py create-developer --email … --name …</code>.
% end
</p>
<form method="post" action="/dashboard/operator/registration">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <input type="hidden" name="open" value="{{'false' if registration else 'true'}}">
  <button type="submit" class="secondary">{{'Close registration' if registration else 'Open registration'}}</button>
</form>
% if registration_warnings:
<ul id="registration-warnings" class="error">
% for warning in registration_warnings:
  <li>{{warning}}</li>
% end
</ul>
% end
<h2>Developers</h2>
<div class="scroll">
<table id="developers">
  <thead><tr><th scope="col">Email</th><th scope="col">Name</th><th scope="col">Live pauses this month</th><th scope="col">Test pauses this month</th><th scope="col">Plan</th></tr></thead>
  <tbody>
% for developer in developers:
    <tr>
      <td>{{developer['email']}}{{' (operator)' if developer['is_operator'] else ''}}</td>
      <td>{{developer['name']}}</td>
% if developer['plan'] in plans:
      <td>{{developer['live_this_month']}} of {{plans[developer['plan']]}}</td>
% else:
      <td>{{developer['live_this_month']}} (plan <strong>{{developer['plan']}}</strong> is not configured: live pauses are refused)</td>
% end
      <td>{{developer['test_this_month']}}</td>
      <td>
        <form method="post" action="/dashboard/operator/plan" class="inline">
          <input type="hidden" name="csrf" value="{{csrf}}">
          <input type="hidden" name="email" value="{{developer['email']}}">
          <label class="visually-hidden" for="plan-{{developer['id']}}">Plan of {{developer['email']}}</label>
          <select id="plan-{{developer['id']}}" name="plan">
% if developer['plan'] not in plans:
            <option value="{{developer['plan']}}" selected>{{developer['plan']}} (not configured)</option>
% end
% for plan in sorted(plans):
            <option value="{{plan}}"{{!' selected' if plan == developer['plan'] else ''}}>{{plan}} ({{plans[plan]}} a month)</option>
% end
          </select>
          <button type="submit" class="secondary">Change</button>
        </form>
      </td>
    </tr>
% end
  </tbody>
</table>
</div>
% if next_cursor:
<p><a href="/dashboard/operator?cursor={{next_cursor}}" rel="next">More developers</a></p>
% end
