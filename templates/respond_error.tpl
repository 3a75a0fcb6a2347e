% rebase('base.tpl', title=get('title', 'Cannot continue'))
<p class="outcome" id="outcome">{{message}}</p>
% if get('back'):
<p><a href="{{back}}">Back to the dashboard</a></p>
% end
